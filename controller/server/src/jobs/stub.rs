//! `JobService` of a controller started without the jobs layer
//! ([`crate::server::start_with_workloads`] with custom workloads): every RPC answers
//! `UNIMPLEMENTED`.

use futures::stream::BoxStream;
use geomx_proto::v1::job_service_server::JobService;
use geomx_proto::v1::{
    CancelJobRequest, GetJobRequest, Job, JobEventsRequest, JobEventsResponse, ListJobsRequest,
    ListJobsResponse, LogChunk, RemoveJobRequest, RemoveJobResponse, SubmitJobRequest,
    SubmitJobResponse, UserLogsRequest,
};
use tonic::{Request, Response, Status};

const NOT_YET: &str = "this controller was started without the jobs layer";

/// Placeholder `JobService`: every RPC answers `UNIMPLEMENTED`.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoJobApi;

#[tonic::async_trait]
impl JobService for NoJobApi {
    async fn submit_job(
        &self,
        _request: Request<SubmitJobRequest>,
    ) -> Result<Response<SubmitJobResponse>, Status> {
        Err(Status::unimplemented(NOT_YET))
    }

    async fn get_job(&self, _request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        Err(Status::unimplemented(NOT_YET))
    }

    async fn list_jobs(
        &self,
        _request: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        Err(Status::unimplemented(NOT_YET))
    }

    async fn cancel_job(
        &self,
        _request: Request<CancelJobRequest>,
    ) -> Result<Response<Job>, Status> {
        Err(Status::unimplemented(NOT_YET))
    }

    async fn remove_job(
        &self,
        _request: Request<RemoveJobRequest>,
    ) -> Result<Response<RemoveJobResponse>, Status> {
        Err(Status::unimplemented(NOT_YET))
    }

    type WatchJobStream = BoxStream<'static, Result<Job, Status>>;

    async fn watch_job(
        &self,
        _request: Request<GetJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        Err(Status::unimplemented(NOT_YET))
    }

    async fn job_events(
        &self,
        _request: Request<JobEventsRequest>,
    ) -> Result<Response<JobEventsResponse>, Status> {
        Err(Status::unimplemented(NOT_YET))
    }

    type NodeLogsStream = BoxStream<'static, Result<LogChunk, Status>>;

    async fn node_logs(
        &self,
        _request: Request<UserLogsRequest>,
    ) -> Result<Response<Self::NodeLogsStream>, Status> {
        Err(Status::unimplemented(NOT_YET))
    }
}
